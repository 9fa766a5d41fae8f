"""The GPU checks of issue 5 in one run: hf_gpt against transformers' GPT2LMHeadModel, same weights.

    PYTHONPATH=. python -m benchmarks.gpu_bench --out $OUT            # on a GPU machine
    python -m benchmarks.gpu_bench --device cpu --quick --out /tmp/x  # plumbing check anywhere

Sections (each writes its results to `<out>/gpu_bench.json` as soon as it ends, and is skipped when the
time budget `--budget` would be exceeded):
1. parity: fp32 logits of both models on the device, and greedy tokens.
2. train: GPT-2 124M at sequence 1024 on packed rows (no padding mask), bf16 autocast with fp32 master
   weights, clipping and fused AdamW, eager and with the whole model compiled (`torch.compile(model)`, both
   models; `train_compiled_2x` at twice the batch, `train_compiled_2x_nodropout` also with dropout 0);
   tokens/s, peak memory and model FLOPs utilisation. FLOPs per token = 6 N + 12 L d T (PaLM, appendix B;
   nanoGPT's `estimate_mfu`): N the parameters without the position embeddings (the tied head counted once),
   L layers, d width, T sequence length; attention counted without the causal saving. Peak: 989.4 TFLOP/s,
   the dense bf16 figure of the H100/H200 SXM datasheet; the measured bf16 matmul rate is reported beside it.
   With `profile` in the sections, also the top kernels of one more step of each model, by device time.
3. decode: greedy `generate()` at batch 1, bf16 weights, static cache (generate() then compiles the
   forward itself, mode "reduce-overhead"), and the eager dynamic-cache baseline; milliseconds per token.
4. decode_breakdown: where a decoding token's time goes: the compiled forward alone in a bare loop (static
   cache, CUDA graphs, argmax), kernel time per generate() token, and generate()'s Python hot spots.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.bench import build_reference, check_same_model, greedy_kwargs, load, training_batch

PEAK_BF16_TFLOPS = 989.4  # H100 / H200 SXM, dense bf16, datasheet


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: plumbing only")
    p.add_argument("--batch", type=int, default=16, help="training batch at sequence 1024 (default 16)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    p.add_argument(
        "--sections",
        default="parity,train,train_compiled,profile,decode,decode_breakdown,train_compiled_2x,train_compiled_2x_nodropout",
        help="comma-separated, run in this order (`profile`: train_compiled also profiles a step)",
    )
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


def train_step_fn(model, opt, batch: dict, device: str):
    """One step as Trainer(bf16=True) runs it: bf16 autocast over fp32 weights, clipping, fused AdamW (without
    the cast of the outputs to fp32 that `bench.train_step_fn` adds as Accelerate does: on a GPU it would add a
    full fp32 copy of transformers' logits to its step)."""

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_rows(
    ref, ours, args, compiled: bool, batch_size: int | None = None, profiled: bool = False, dropout: bool = True
) -> list[dict]:
    """Training tokens/s, MFU and peak memory of both models, eager or with the whole model compiled
    (`torch.compile(model)`, which is also what `Trainer(torch_compile=True)` does); with `profiled`, also the
    top ops of one more step; without `dropout`, both with GPT-2's dropouts set to 0 (as pretraining runs now)."""
    import copy

    device, T = args.device, args.seq
    B = batch_size or args.batch_size
    batch = training_batch(ref.config.vocab_size, B, T, device, attention_mask=False)  # packed rows, no padding
    results = {}
    for name, base in (("transformers", ref), ("hf_gpt", ours)):
        model = copy.deepcopy(base).train()
        if not dropout:
            model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        start = time.perf_counter()
        runner = torch.compile(model, backend=args.compile_backend, dynamic=False) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=device.startswith("cuda"))
        step = train_step_fn(runner, opt, batch, device)
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
        if profiled:
            results[name]["profile"] = profile_step(step, device)
            print(f"# profile {name} ({B}x{T})\n{results[name]['profile']['table']}", flush=True)
        del model, runner, opt, step
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    tag = ("compiled model" if compiled else "eager") + ("" if dropout else ", no dropout")
    return [
        dict(
            name=f"train bf16 {tag} ({B}x{T})",
            transformers=results["transformers"],
            hf_gpt=results["hf_gpt"],
            ratio=results["hf_gpt"]["tok_s"] / results["transformers"]["tok_s"],
        )
    ]


def profile_step(step, device: str) -> dict:
    """Top ops of one training step by self device time (CPU time on CPU), and the step's total device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    table = events.table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25, max_name_column_width=60
    )
    return dict(table=table, device_ms=kernel_ms(events))


def kernel_ms(events) -> float:
    """Milliseconds the device spent in kernels (the profiler also credits their time to the ops and compiled
    graphs that launched them; those are not counted again)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3


def decode_kwargs(ids: torch.Tensor, new_tokens: int, eos: int, cache: str) -> dict:
    kw = greedy_kwargs(ids, new_tokens, eos)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return kw


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
            kw = decode_kwargs(ids, N, ref.config.eos_token_id, cache)
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


def decode_breakdown(ref, ours, args) -> dict:
    """Where a generate() token's time goes, for each model (bf16, batch 1, static cache + compile): the compiled
    forward alone in a bare loop (a static cache, CUDA graphs, argmax), generate()'s device time per token, and
    generate()'s Python hot spots (cProfile)."""
    import copy
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    device, N = args.device, args.new_tokens
    cuda = device.startswith("cuda")
    torch.manual_seed(4)
    ids = torch.randint(0, ref.config.vocab_size, (1, 32), device=device)
    result = {}
    for name, base in (("transformers", ref), ("hf_gpt", ours)):
        model = copy.deepcopy(base).to(torch.bfloat16).eval()
        info = {}
        # (transformers 5.24 renamed `past_key_values` to `cache`)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # 1. the compiled forward alone
        length = ids.shape[1] + N
        cache = StaticCache(config=model.config, max_cache_len=length)
        mode = "reduce-overhead" if cuda else None
        forward = torch.compile(model, backend=args.compile_backend, mode=mode, fullgraph=True, dynamic=False)
        step_ms = []
        for _ in range(3):
            cache.reset()
            mask = torch.zeros(1, length, dtype=torch.long, device=device)
            mask[:, : ids.shape[1]] = 1
            positions = torch.arange(length, device=device)  # (made once: a copy from the host would wait for the GPU)
            position = positions[: ids.shape[1]]
            with torch.no_grad():
                logits = model(ids, attention_mask=mask, cache_position=position, **{cache_arg: cache}).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                t0 = time.perf_counter()
                for i in range(N - 1):
                    mask[:, ids.shape[1] + i] = 1
                    position = positions[ids.shape[1] + i : ids.shape[1] + i + 1]
                    out = forward(token, attention_mask=mask, cache_position=position, **{cache_arg: cache})
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
            step_ms.append((time.perf_counter() - t0) / (N - 1) * 1e3)
        info["compiled_forward_loop_ms_per_token"] = step_ms
        # 2. generate(): device time per token, and Python hot spots
        kw = decode_kwargs(ids, N, ref.config.eos_token_id, "static")
        for _ in range(3):
            model.generate(ids, **kw)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            model.generate(ids, **kw)
            sync(device)
        events = prof.key_averages()
        info["generate_device_ms_per_token"] = kernel_ms(events) / N
        info["generate_top_ops"] = events.table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12, max_name_column_width=60
        )
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        model.generate(ids, **kw)
        sync(device)
        profiler.disable()
        info["generate_under_cprofile_ms_per_token"] = (time.perf_counter() - t0) / N * 1e3
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        info["generate_cprofile"] = text.getvalue()[-6000:]
        print(
            f"# decode breakdown {name}: {info['compiled_forward_loop_ms_per_token']} ms/token compiled loop, "
            f"{info['generate_device_ms_per_token']:.3f} ms device time per generate() token",
            flush=True,
        )
        result[name] = info
        del model, forward, cache
    return result


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
    need = dict(
        parity=10,
        train=30,
        train_compiled=120,
        train_compiled_2x=120,
        decode=60,
        decode_breakdown=60,
        profile=0,
        train_compiled_2x_nodropout=120,
    )
    for section in sections:
        left = args.budget - (time.perf_counter() - t_start)
        if left < need[section] and not args.quick:
            result["errors"][section] = f"skipped: {left:.0f} s of budget left"
            save()
            continue
        try:
            if section == "parity":
                result["parity"] = check_same_model(ref, ours, ref.config.vocab_size)
                prompt = torch.tensor([[464, 2068, 7586, 21831]], device=args.device) % ref.config.vocab_size
                kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=ref.config.eos_token_id)
                result["parity"]["greedy_equal"] = torch.equal(ref.generate(prompt, **kw), ours.generate(prompt, **kw))
            elif section == "train":
                result["rows"] += train_rows(ref, ours, args, compiled=False, profiled="profile" in sections)
            elif section == "train_compiled":
                result["rows"] += train_rows(ref, ours, args, compiled=True, profiled="profile" in sections)
            elif section == "train_compiled_2x":
                result["rows"] += train_rows(ref, ours, args, compiled=True, batch_size=2 * args.batch_size)
            elif section == "train_compiled_2x_nodropout":
                result["rows"] += train_rows(
                    ref, ours, args, compiled=True, batch_size=2 * args.batch_size, dropout=False
                )
            elif section == "decode_breakdown":
                result["decode_breakdown"] = decode_breakdown(ref, ours, args)
            elif section == "decode":
                result["rows"] += decode_rows(ref, ours, args)
            elif section == "profile":
                continue  # (a flag: train_compiled profiles one more step of each model)
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
