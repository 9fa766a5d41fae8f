"""lm-evaluation-harness (issue 8): `lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True`
runs two local Shakespeare tasks (multiple choice, rolling perplexity) on a saved hf_gpt folder.

The command runs, as a user would type it, in a Python that cannot import hf_gpt and has no network
(`run_isolated` from test_remote_code), so the model comes from the folder's own code. The harness's
per-request log-likelihoods, its accuracy and perplexities, and the context length it reads are then
checked against the same model computed here directly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import early, early_prepared, early_result
from test_remote_code import run_isolated

from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer

# Slow: lm_eval runs in a fresh interpreter. (A skip mark rather than a module-level importorskip: the tests are
# still collected, and reported as skipped.)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install -e '.[ecosystem]'"),
]

# Famous lines (public domain), split where a reader would be asked to complete them.
LINES = [
    ("To be, or not to be,", "that is the question"),
    ("All the world's a stage,", "and all the men and women merely players"),
    ("Now is the winter", "of our discontent"),
    ("Friends, Romans, countrymen,", "lend me your ears"),
    ("But, soft! what light", "through yonder window breaks"),
    ("The course of true love", "never did run smooth"),
    ("If music be the food of love,", "play on"),
    ("Shall I compare thee", "to a summer's day"),
    ("A horse! a horse!", "my kingdom for a horse"),
    ("Double, double", "toil and trouble"),
    ("Something is rotten", "in the state of Denmark"),
    ("What's in a name? That which we call a rose", "by any other name would smell as sweet"),
]
N_CHOICES = 4

MC_YAML = """\
task: shakespeare_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

PPL_YAML = """\
task: shakespeare_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def mc_docs() -> list[dict]:
    """Each context with its own ending and three others; the right one at a varying place."""
    docs = []
    for i, (context, _) in enumerate(LINES):
        endings = [LINES[(i + k) % len(LINES)][1] for k in range(N_CHOICES)]  # endings[0] is the right one
        label = i % N_CHOICES
        endings[0], endings[label] = endings[label], endings[0]
        docs.append({"context": context, "choices": endings, "label": label})
    return docs


def write_tasks(folder) -> None:
    folder.mkdir()
    (folder / "mc.json").write_text(json.dumps(mc_docs()))
    (folder / "ppl.json").write_text(json.dumps([{"text": f"{a} {b}"} for a, b in LINES]))
    (folder / "shakespeare_mc.yaml").write_text(MC_YAML.format(data=folder / "mc.json"))
    (folder / "shakespeare_ppl.yaml").write_text(PPL_YAML.format(data=folder / "ppl.json"))


@early("lm_eval_run")
def run_lm_eval(work: Path):
    """Prepared: the model folder and the task files. Run in the background (conftest's `early`): the `lm_eval`
    command line in an isolated Python. Returns (model, tokenizer) and the output folder."""
    torch.manual_seed(0)
    # A GPT-2 preset at toy width: n_positions 1024 comes from the preset.
    model = GPTForCausalLM(GPTConfig.from_preset("gpt2", n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():  # peaked attention, so a wrong position or mask would change the numbers
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    # The tokenizer says nothing about length (transformers' "infinity"), so 1024 can only come from the config.
    tokenizer = gpt2_tokenizer(model_max_length=int(1e30))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    write_tasks(work / "tasks")
    out = work / "out"

    def run() -> Path:
        run_isolated(
            """
            import runpy, sys
            sys.argv = ["lm_eval", "--model", "hf",
                        "--model_args", "pretrained={model},trust_remote_code=True",
                        "--tasks", "shakespeare_mc,shakespeare_ppl", "--include_path", {tasks!r},
                        "--device", "cpu", "--batch_size", "8", "--output_path", {out!r}, "--log_samples"]
            runpy.run_module("lm_eval", run_name="__main__")
            """,
            work,
            model=work / "model",
            tasks=str(work / "tasks"),
            out=str(out),
        )
        return out

    return (model, tokenizer), run


@pytest.fixture(scope="module")
def lm_eval_run():
    return early_result("lm_eval_run")


@pytest.fixture(scope="module")
def harness(lm_eval_run):
    """(our model, tokenizer, lm_eval's results dict, its logged samples per task)."""
    model, tokenizer = early_prepared("lm_eval_run")
    out = lm_eval_run
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    samples = {}
    for task in ("shakespeare_mc", "shakespeare_ppl"):
        (f,) = out.glob(f"*/samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return model, tokenizer, results, samples


def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """log p(continuation | context) summed over its tokens, for each (context, continuation) pair, computed
    directly in one right-padded batch."""
    rows = [ctx + cont for ctx, cont in pairs]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        logprobs = model(ids, attention_mask=mask).logits.float().log_softmax(-1)  # (N, T, vocab)
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        steps = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)  # position t predicts token t + 1
        out.append(logprobs[i, steps, torch.tensor(cont)].sum().item())
    return out


def test_harness_reads_max_length_from_config(harness):
    _, _, results, _ = harness
    assert results["max_length"] == 1024  # the preset's n_positions, not the harness's 2048 fallback
    assert results["config"]["model_args"]["trust_remote_code"] is True


def test_multiple_choice_loglikelihoods_and_accuracy(harness):
    model, tok, results, samples = harness
    docs = mc_docs()
    rows = samples["shakespeare_mc"]
    assert len(rows) == len(docs)
    pairs = []
    for doc in docs:
        context = tok(doc["context"]).input_ids
        for choice in doc["choices"]:
            # The harness's split: encode context + " " + choice whole, the continuation is what follows the context.
            whole = tok(doc["context"] + " " + choice).input_ids
            pairs.append((context, whole[len(context) :]))
    ours = continuation_logprobs(model, pairs)
    correct = 0
    for d, (doc, row) in enumerate(zip(docs, rows, strict=True)):
        mine = ours[d * N_CHOICES : (d + 1) * N_CHOICES]
        theirs = [float(resp[0][0]) for resp in row["resps"]]
        assert theirs == pytest.approx(mine, abs=1e-4), doc["context"]
        right = float(max(range(N_CHOICES), key=mine.__getitem__) == doc["label"])
        assert row["acc"] == right
        correct += right
    assert results["results"]["shakespeare_mc"]["acc,none"] == pytest.approx(correct / len(docs), abs=1e-12)


def test_rolling_perplexity_equals_direct_computation(harness):
    model, tok, results, samples = harness
    eot = tok.eos_token_id
    texts = [f"{a} {b}" for a, b in LINES]
    # A short document is one window: its first token is predicted from <|endoftext|>.
    ours = continuation_logprobs(model, [([eot], tok(text).input_ids) for text in texts])
    for text, ll, row in zip(texts, ours, samples["shakespeare_ppl"], strict=True):
        assert float(row["resps"][0][0]) == pytest.approx(ll, abs=1e-4), text
    total_ll = sum(ours)
    words = sum(len(re.split(r"\s+", text)) for text in texts)
    nbytes = sum(len(text.encode("utf-8")) for text in texts)
    got = results["results"]["shakespeare_ppl"]
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-5)
