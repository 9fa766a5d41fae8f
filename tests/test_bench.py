"""Benchmark plumbing (issue 5): `hf-gpt bench --quick` and the GPU script's CPU dry run. No timing asserts."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import bench, gpu_bench

pytestmark = pytest.mark.slow  # the quick bench runs each model's rows in fresh processes; the GPU bench traces

ROWS = [
    "train fp32",
    "train bf16",
    "train fp32 activation memory",
    "train bf16 activation memory",
    "prefill fp32",
    "prefill bf16",
    "decode fp32 batch 1",
    "decode fp32 batch 4",
    "decode bf16 batch 1",
    "decode bf16 batch 4",
]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_bench_starts_from_identical_models(quick_result):
    parity = quick_result["parity"]
    assert parity["max_abs_weight_diff"] == 0.0
    assert parity["max_abs_logit_diff"] < 1e-5
    assert parity["identical"]


def test_quick_bench_records_the_openmp_wait_policy(quick_result):
    # The decoding rows move with it (README "Speed"), so each result says which one it ran under.
    assert quick_result["machine"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "default")


def test_quick_bench_reports_every_row_with_sane_numbers(quick_result):
    rows = {r["name"]: r for r in quick_result["rows"]}
    assert list(rows) == ROWS
    for name, r in rows.items():
        for key in ("transformers", "hf_gpt", "ratio"):
            assert math.isfinite(r[key]), (name, key)
        if "memory" in name:
            assert r["transformers"] > 0 and r["hf_gpt"] >= 0, name
        else:
            assert r["transformers"] > 0 and r["hf_gpt"] > 0 and r["ratio"] > 0, name
            assert len(r["seconds"]["transformers"]) == len(r["seconds"]["hf_gpt"]) == quick_result["repeats"]
    for name in ROWS:
        if name.startswith("decode fp32"):
            assert rows[name]["same_tokens"] == 1.0, name  # fp32 greedy decoding agrees token for token
    assert "| train bf16 (2x32) | tok/s |" in quick_result["table"]
    assert ">= 2.0" in quick_result["table"]


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    # (two timed steps per training row, not ten: nothing here reads the times but for being positive)
    assert gpu_bench.main(["--device", "cpu", "--quick", "--steps", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["errors"] == {}, result["errors"]
    assert result["parity"]["identical"] and result["parity"]["greedy_equal"]
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "train bf16 eager (2x64)" and names[1] == "train bf16 compiled model (2x64)"
    assert names[2].startswith("decode bf16 batch 1, static cache")
    assert names[3].startswith("decode bf16 batch 1, dynamic cache")
    assert names[4] == "train bf16 compiled model (4x64)"
    assert names[5] == "train bf16 compiled model, no dropout (4x64)"
    for model in ("transformers", "hf_gpt"):  # the profiled step's top ops
        assert "aten::" in result["rows"][1][model]["profile"]["table"]
        breakdown = result["decode_breakdown"][model]
        assert len(breakdown["compiled_forward_loop_ms_per_token"]) == 3
        assert "function calls" in breakdown["generate_cprofile"]
    for r in result["rows"]:
        assert r["ratio"] > 0
        key = "tok_s" if r["name"].startswith("train") else "ms_per_token"
        assert r["transformers"][key] > 0 and r["hf_gpt"][key] > 0
    assert 0 < result["rows"][0]["hf_gpt"]["mfu"] < 1
