"""The GPU checks of issue 5 in one run: hf_gpt against transformers' GPT2LMHeadModel, same weights.

    PYTHONPATH=. python -m benchmarks.gpu_bench --out $OUT            # on a GPU machine
    python -m benchmarks.gpu_bench --device cpu --quick --out /tmp/x  # plumbing check anywhere

Sections (each writes its results to `<out>/gpu_bench.json` as soon as it ends, and is skipped when the
time budget `--budget` would be exceeded):
1. parity: fp32 logits of both models on the device, and greedy tokens.
2. train: GPT-2 124M at sequence 1024, bf16 autocast with fp32 master weights and fused AdamW, eager and
   with each block compiled (`block.compile()`, both models); tokens/s, peak memory and model FLOPs
   utilisation. FLOPs per token = 6 N + 12 L d T (PaLM, appendix B; nanoGPT's `estimate_mfu`): N the
   parameters without the position embeddings (the tied head counted once), L layers, d width, T
   sequence length; attention counted without the causal saving. Peak: 989.4 TFLOP/s, the dense bf16
   figure of the H100/H200 SXM datasheet; the measured bf16 matmul rate is reported beside it.
3. decode: greedy `generate()` at batch 1, bf16 weights, static cache (generate() then compiles the
   forward itself, mode "reduce-overhead"), and the eager dynamic-cache baseline; milliseconds per token.
4. profile (not run by default): the top ops of one eager training step of each model, by device time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.bench import build_reference, check_same_model, load

PEAK_BF16_TFLOPS = 989.4  # H100 / H200 SXM, dense bf16, datasheet


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: plumbing only")
    p.add_argument("--batch", type=int, default=16, help="training batch at sequence 1024 (default 16)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budget", type=float, default=380.0, help="seconds; later sections are skipped past it")
    p.add_argument("--sections", default="parity,train,decode,train_compiled", help="also: profile")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; quick: eager)")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


def matmul_tflops(device: str, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * size**3 * 10 / (time.perf_counter() - start) / 1e12


def train_rows(ref, ours, args, compiled: bool) -> list[dict]:
    import copy

    device, T, B = args.device, args.seq, args.batch_size
    torch.manual_seed(2)
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device=device)
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids,
        num_items_in_batch=torch.tensor(B * (T - 1), device=device),
    )
    results = {}
    for name, base in (("transformers", ref), ("hf_gpt", ours)):
        model = copy.deepcopy(base).train()
        start = time.perf_counter()
        if compiled:
            for block in model.transformer.h:
                block.compile(backend=args.compile_backend)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=device.startswith("cuda"))

        def step(model=model, opt=opt):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        sync(device)
        warm_s = time.perf_counter() - start
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        tok_s = B * T / statistics.median(times)
        mfu = tok_s * flops_per_token(model, T) / (PEAK_BF16_TFLOPS * 1e12)
        results[name] = dict(tok_s=tok_s, mfu=mfu, peak_gib=peak, warmup_and_compile_s=warm_s, step_s=times)
        del model, opt
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    tag = "compiled blocks" if compiled else "eager"
    return [
        dict(
            name=f"train bf16 {tag} ({B}x{T})",
            transformers=results["transformers"],
            hf_gpt=results["hf_gpt"],
            ratio=results["hf_gpt"]["tok_s"] / results["transformers"]["tok_s"],
        )
    ]


def profile_train(ref, ours, args) -> dict:
    """Top ops of one eager bf16 training step of each model, by self device time (CPU time on CPU)."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    device, T, B = args.device, args.seq, args.batch_size
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device=device)
    cuda = device.startswith("cuda")
    result = {}
    for name, base in (("transformers", ref), ("hf_gpt", ours)):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=cuda)

        def step(model=model, opt=opt):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.zero_grad(set_to_none=True)

        step()
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            sync(device)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        result[name] = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50)
        print(f"# profile {name}\n{result[name]}", flush=True)
        del model, opt
    return result


def decode_rows(ref, ours, args) -> list[dict]:
    import copy

    device, N = args.device, args.new_tokens
    torch.manual_seed(4)
    ids = torch.randint(0, ref.config.vocab_size, (1, 32), device=device)
    rows = []
    for cache in ("static", "dynamic"):
        results = {}
        for name, base in (("transformers", ref), ("hf_gpt", ours)):
            model = copy.deepcopy(base).to(torch.bfloat16).eval()
            kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=ref.config.eos_token_id)
            kw["attention_mask"] = torch.ones_like(ids)
            if cache == "static":
                kw["cache_implementation"] = "static"
            start = time.perf_counter()
            for _ in range(3):  # the first call compiles, the next records CUDA graphs
                out = model.generate(ids, **kw)
            sync(device)
            warm_s = time.perf_counter() - start
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = model.generate(ids, **kw)
                sync(device)
                times.append(time.perf_counter() - t0)
            results[name] = dict(
                ms_per_token=statistics.median(times) / N * 1e3,
                warmup_and_compile_s=warm_s,
                tokens=out[0, -8:].tolist(),
            )
            del model
        rows.append(
            dict(
                name=f"decode bf16 batch 1, {cache} cache{' + compile' if cache == 'static' else ''} (1x32+{N})",
                transformers=results["transformers"],
                hf_gpt=results["hf_gpt"],
                ratio=results["transformers"]["ms_per_token"] / results["hf_gpt"]["ms_per_token"],
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
    args.seq, args.batch_size = (64, 2) if args.quick else (1024, args.batch)
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    args.new_tokens = min(args.new_tokens, 16) if args.quick else args.new_tokens
    import transformers

    info = dict(torch=torch.__version__, transformers=transformers.__version__, device=args.device)
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["measured_bf16_matmul_tflops"] = matmul_tflops(args.device, 8192)
    result = dict(info=info, peak_bf16_tflops=PEAK_BF16_TFLOPS, rows=[], errors={})
    out_file = args.out / "gpu_bench.json"

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        out_file.write_text(json.dumps(result, indent=1, default=str))

    print(info, flush=True)
    model_shape = dict(vocab_size=2048, n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        build_reference(Path(tmp), model_shape if args.quick else {})
        ref, ours = (load(Path(tmp), w).to(args.device) for w in ("transformers", "hf_gpt"))
    sections = args.sections.split(",")
    # Rough minimum seconds each section needs; a section starts only if that much budget is left.
    need = dict(parity=10, train=30, train_compiled=120, decode=150, profile=20)
    for section in sections:
        left = args.budget - (time.perf_counter() - t_start)
        if left < need[section] and not args.quick:
            result["errors"][section] = f"skipped: {left:.0f} s of budget left"
            continue
        try:
            if section == "parity":
                result["parity"] = check_same_model(ref, ours, ref.config.vocab_size)
                prompt = torch.tensor([[464, 2068, 7586, 21831]], device=args.device) % ref.config.vocab_size
                kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=ref.config.eos_token_id)
                result["parity"]["greedy_equal"] = torch.equal(ref.generate(prompt, **kw), ours.generate(prompt, **kw))
            elif section == "train":
                result["rows"] += train_rows(ref, ours, args, compiled=False)
            elif section == "train_compiled":
                result["rows"] += train_rows(ref, ours, args, compiled=True)
            elif section == "decode":
                result["rows"] += decode_rows(ref, ours, args)
            elif section == "profile":
                result["profile"] = profile_train(ref, ours, args)
        except Exception:  # keep the other sections' numbers
            result["errors"][section] = traceback.format_exc()[-3000:]
        print(f"# {section} done at {time.perf_counter() - t_start:.0f} s", flush=True)
        save()
    print(json.dumps(result, indent=1, default=str))
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    """The rows as a markdown table (the numbers the README quotes)."""
    lines = [
        f"# {result['info']}",
        "| measurement | transformers | hf_gpt | hf_gpt vs transformers |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        a, b = r["transformers"], r["hf_gpt"]
        if "tok_s" in a:
            cell = lambda x: f"{x['tok_s']:,.0f} tok/s, MFU {x['mfu']:.1%}, {x['peak_gib']:.1f} GiB"  # noqa: E731
        else:
            cell = lambda x: f"{x['ms_per_token']:.3f} ms/token"  # noqa: E731
        lines.append(f"| {r['name']} | {cell(a)} | {cell(b)} | {r['ratio']:.2f}x |")
    lines += [f"# parity: {result.get('parity')}", f"# errors: {list(result['errors'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
