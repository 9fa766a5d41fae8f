"""Benchmark plumbing (issue 5): `hf-gpt bench --quick` and the GPU script's CPU dry run. No timing asserts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import early, early_result

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


def bench_command(module: str, *args: str) -> Callable[[], dict]:
    """`python -m benchmarks.<module> ARGS`, run to completion; returns its exit status, output and JSON result."""

    def run() -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            timeout=900,
        )
        return dict(returncode=proc.returncode, stderr=proc.stderr)

    return run


@early("quick_result")
def run_quick_bench(workdir: Path):
    """`hf-gpt bench --quick` as a command line (each model's training and memory rows run in fresh processes of
    their own: most of a minute, spent on the second core while other tests run)."""
    out = workdir / "bench.json"
    run = bench_command("bench", "--quick", "--threads", "1", "--json", str(out))
    return None, lambda: {**run(), "json": out}


@early("gpu_bench_result")
def run_gpu_bench(workdir: Path):
    """The GPU script's CPU dry run, as a command line. (Two timed steps per training row, not ten: nothing here reads
    the times but for being positive.)"""
    run = bench_command("gpu_bench", "--device", "cpu", "--quick", "--steps", "2", "--out", str(workdir))
    return None, lambda: {**run(), "json": workdir / "gpu_bench.json"}


def read(result: dict) -> dict:
    assert result["returncode"] == 0, result["stderr"][-3000:]
    return json.loads(result["json"].read_text())


@pytest.fixture(scope="module")
def quick_result():
    return read(early_result("quick_result"))


@pytest.fixture(scope="module")
def gpu_bench_result():
    return read(early_result("gpu_bench_result"))


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


def test_gpu_bench_dry_run_on_cpu(gpu_bench_result):
    result = gpu_bench_result
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
