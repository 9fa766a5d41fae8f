"""`hf-gpt bench`: hf_gpt against transformers' GPT2LMHeadModel holding the same weights, side by side.

Both models are built from one seeded `GPT2LMHeadModel` saved to a temporary folder (ours loads it
with the Conv1D transposes), checked to give the same fp32 logits, then timed with the same inputs,
shape, dtype, batch and thread count. Each measurement alternates the two models (A B, B A, ...) after
warm-up, so slow drifts of a shared machine hit both; the table gives each model's median and the
median of the per-repeat ratios.

Rows:
- train fp32 / bf16: one training step as `Trainer` runs it: forward with labels and
  `num_items_in_batch` (under `torch.autocast(bfloat16)` with outputs cast back to fp32, which is what
  `Accelerator.prepare_model` does for `Trainer(bf16=True)`), backward, `clip_grad_norm_(1.0)`, fused
  AdamW (Trainer's default optimizer), `zero_grad`. fp32 master weights and optimizer state.
- train activation memory: a fresh process per model; resting RSS with weights, gradients and
  AdamW state allocated, then the peak RSS of one more step (VmHWM, reset through /proc/self/clear_refs);
  the difference is what the step adds: activations and temporaries. glibc is told to return every
  block of 64 KiB or more to the kernel at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory.
- prefill: eval forward over a long prompt (batch 1) with a cache, last-token logits only, as
  `generate()` runs it.
- decode: greedy `generate()` of N new tokens (min_new_tokens = max_new_tokens) from a short prompt,
  both models in the same dtype (fp32, or weights cast to bf16).

Usage: `hf-gpt bench [--quick] [--threads 2] [--repeats 5] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Targets of issue 5 (ratio hf_gpt / transformers; for memory lower is better).
TARGETS = {
    "train fp32": (">=", 1.2),
    "train bf16": (">=", 2.0),
    "train fp32 activation memory": ("<=", 0.6),
    "train bf16 activation memory": ("<=", 0.6),
    "decode fp32 batch 1": (">=", 1.0),
    "decode bf16 batch 1": (">=", 2.0),
    "decode bf16 batch 16": (">=", 1.5),
}
FULL = dict(model=dict(), batch=4, seq=256, prefill=1024, prompt=32, new_tokens=128, decode_batches=(1, 16))
QUICK = dict(
    model=dict(vocab_size=2048, n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
    batch=2,
    seq=32,
    prefill=64,
    prompt=8,
    new_tokens=8,
    decode_batches=(1, 4),
)
MODELS = ("transformers", "hf_gpt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf-gpt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat: checks the plumbing (CI), no timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both models (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per model first (default 2, quick 1)")
    p.add_argument(
        "--rows",
        default="train,memory,prefill,decode",
        help="comma list of row groups to run (train, memory, prefill, decode; profile: where a training step's time goes)",
    )
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4)")
    p.add_argument("--seq", type=int, default=None, help="training sequence length (default 256)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode: new tokens per generate (default 128)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--memory-child", nargs=3, metavar=("FOLDER", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--train-child", nargs=3, metavar=("FOLDER", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    args.shape = dict(shape)
    for key in ("batch", "seq", "new_tokens"):
        if getattr(args, key) is not None:
            args.shape[key] = getattr(args, key)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


# ---------------------------------------------------------------- models


def build_reference(folder: Path, model_overrides: dict) -> None:
    """A seeded transformers GPT-2 (GPT2Config() = 124M unless overridden), saved for both models to load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**model_overrides)).save_pretrained(folder)


def load(folder: Path, which: str) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    from hf_gpt import GPTForCausalLM

    cls = GPT2LMHeadModel if which == "transformers" else GPTForCausalLM
    return cls.from_pretrained(folder)


def check_same_model(ref: torch.nn.Module, ours: torch.nn.Module, vocab: int) -> dict:
    """Identical weights (ours stores Conv1D weights transposed) and fp32 logits at the start."""
    from transformers.pytorch_utils import Conv1D

    conv1d = {f"{name}.weight" for name, m in ref.named_modules() if isinstance(m, Conv1D)}
    ours_params = dict(ours.named_parameters())
    weight_diff = 0.0
    for name, p in ref.named_parameters():  # same names; the tied lm_head is listed once, as wte
        theirs = p.T if name in conv1d else p
        weight_diff = max(weight_diff, (ours_params[name] - theirs).abs().max().item())
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 48)).to(ref.device)
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(ids, labels=ids), ours(ids, labels=ids)
    return dict(
        max_abs_weight_diff=weight_diff,
        max_abs_logit_diff=(a.logits - b.logits).abs().max().item(),
        loss_diff=abs(a.loss.item() - b.loss.item()),
        identical=weight_diff == 0.0 and (a.logits - b.logits).abs().max().item() < 1e-4,
    )


# ---------------------------------------------------------------- timing


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating the order every repeat after `warmup` untimed calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def row(name: str, unit: str, work: float, times: dict[str, list[float]], **extra) -> dict:
    """Throughput row: `work` units per call; ratio = median over repeats of (ours / theirs) throughput."""
    ref_t, ours_t = times["transformers"], times["hf_gpt"]
    ratio = statistics.median(r / o for r, o in zip(ref_t, ours_t, strict=True))
    return dict(
        name=name,
        unit=unit,
        transformers=work / statistics.median(ref_t),
        hf_gpt=work / statistics.median(ours_t),
        ratio=ratio,
        seconds=times,
        **extra,
    )


def autocast_forward(model: torch.nn.Module, dtype: str) -> Callable:
    """The forward `Trainer` calls: under bf16, autocast around it and outputs cast back to fp32, as
    `accelerate.Accelerator.prepare_model` wraps it (fp32 master weights, optimizer in fp32)."""
    if dtype == "fp32":
        return model.forward
    from accelerate.utils import convert_outputs_to_fp32

    return convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))


def train_step_fn(model: torch.nn.Module, dtype: str, batch: dict, keep_grads: bool = False) -> Callable[[], None]:
    """One `Trainer` training step (forward + loss, backward, clip to 1.0, fused AdamW, zero_grad)."""
    model.train()
    forward = autocast_forward(model, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)

    def step() -> None:
        loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=not keep_grads)

    return step


def training_batch(vocab: int, batch: int, seq: int, device: str = "cpu", attention_mask: bool = True) -> dict:
    """Seeded rows with labels = inputs and the token count Trainer passes as `num_items_in_batch`; with
    `attention_mask`, an all-ones mask as a padding collator gives (without: packed pretraining rows)."""
    torch.manual_seed(2)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    rows = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(batch * (seq - 1), device=device))
    if attention_mask:
        rows["attention_mask"] = torch.ones_like(ids)
    return rows


def greedy_kwargs(ids: torch.Tensor, new_tokens: int, pad_token_id: int) -> dict:
    """`generate()` arguments for greedy decoding of exactly `new_tokens` tokens after unpadded prompts `ids`."""
    return dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )


# ---------------------------------------------------------------- memory (one fresh process per model)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(folder: str, which: str, dtype: str, threads: int, batch: int, seq: int) -> dict:
    torch.set_num_threads(threads)
    model = load(Path(folder), which)
    step = train_step_fn(model, dtype, training_batch(model.config.vocab_size, batch, seq), keep_grads=True)
    step()
    step()  # gradients and AdamW state now exist and stay allocated
    resting = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(
        resting_mib=resting / 1024, peak_mib=peak / 1024, step_mib=(peak - resting) / 1024, weights_mib=n_bytes / 2**20
    )


# Peak RSS counts only what a step really touches when freed memory goes back to the system at once.
MEMORY_ENV = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def measure_memory(folder: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype in ("fp32", "bf16"):
        result = {}
        for which in MODELS:
            result[which] = run_child("memory", folder, which, dtype, args)
        ref, ours = result["transformers"]["step_mib"], result["hf_gpt"]["step_mib"]
        rows.append(
            dict(
                name=f"train {dtype} activation memory",
                unit="MiB",
                transformers=ref,
                hf_gpt=ours,
                ratio=ours / ref,
                detail=result,
            )
        )
    return rows


# ---------------------------------------------------------------- rows


def train_child(folder: str, which: str, dtype: str, args: argparse.Namespace) -> dict:
    """Seconds per training step of one model, alone in this process: `warmup` untimed steps, then `repeats`."""
    model = load(Path(folder), which)
    step = train_step_fn(model, dtype, training_batch(model.config.vocab_size, args.shape["batch"], args.shape["seq"]))
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(seconds=times)


def run_child(kind: str, folder: Path, which: str, dtype: str, args: argparse.Namespace, **kw) -> dict:
    """`hf-gpt bench --<kind>-child` in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.bench", f"--{kind}-child", str(folder), which, dtype]
    cmd += ["--threads", str(args.threads), "--batch", str(args.shape["batch"]), "--seq", str(args.shape["seq"])]
    cmd += [f"--{name}={value}" for name, value in kw.items()]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, **(MEMORY_ENV if kind == "memory" else {}))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_training(folder: Path, args: argparse.Namespace) -> list[dict]:
    """Each model trains alone in its own process, in the order A B B A (half the repeats each time), so both
    meet the same drift. (Interleaving the two models' steps in one process slowed transformers' step by
    1.3x on the project's VM, which pays for every page a process gets back after the other model's step.)"""
    B, T = args.shape["batch"], args.shape["seq"]
    first = (args.repeats + 1) // 2
    rounds = [(MODELS, first), (MODELS[::-1], args.repeats - first)]
    rows = []
    for dtype in ("fp32", "bf16"):
        times: dict[str, list[float]] = {name: [] for name in MODELS}
        for order, repeats in rounds:
            for which in order if repeats else ():
                result = run_child("train", folder, which, dtype, args, repeats=repeats, warmup=args.warmup)
                times[which] += result["seconds"]
        rows.append(row(f"train {dtype}", "tok/s", B * T, times, shape=f"{B}x{T}"))
        print(f"# {rows[-1]['name']}: {rows[-1]['seconds']}", flush=True)
    return rows


# Where the time of a training step goes: torch.profiler self CPU time, grouped by kind of op.
OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"),
    "copies and dtype casts": ("aten::copy_", "aten::cat", "aten::contiguous"),
    "dropout RNG": ("aten::bernoulli_", "aten::uniform_"),
    "softmax / log-softmax (attention, loss)": ("softmax", "log_softmax", "logsumexp"),
    "optimizer, clipping, zero_grad": ("adam", "norm", "zero_", "fill_", "_foreach"),
}


def profile_training(ref, ours, args) -> dict:
    from torch.profiler import profile

    B, T = args.shape["batch"], args.shape["seq"]
    batch = training_batch(ref.config.vocab_size, B, T)
    result = {}
    for dtype in ("fp32", "bf16"):
        for name, base in (("transformers", ref), ("hf_gpt", ours)):
            step = train_step_fn(copy.deepcopy(base), dtype, batch)
            step()
            with profile() as prof:
                step()
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
            for e in events:
                group = next((g for g, keys in OP_GROUPS.items() if any(k in e.key for k in keys)), "other")
                groups[group] += e.self_cpu_time_total
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
            result[f"train {dtype} {name}"] = dict(
                total_s=total / 1e6,
                share={g: round(t / total, 3) for g, t in groups.items()},
                top_ops=[(e.key, e.count, round(e.self_cpu_time_total / 1e6, 3)) for e in top],
            )
            print(f"# profile train {dtype} {name}: {result[f'train {dtype} {name}']}", flush=True)
    return result


def measure_prefill(ref, ours, args) -> list[dict]:
    T = min(args.shape["prefill"], ref.config.n_positions)
    torch.manual_seed(3)
    ids = torch.randint(0, ref.config.vocab_size, (1, T))
    rows = []
    for dtype in ("fp32", "bf16"):
        models = {"transformers": ref, "hf_gpt": ours}
        if dtype == "bf16":
            models = {k: copy.deepcopy(m).to(torch.bfloat16) for k, m in models.items()}

        def prefill(m):
            return lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1)

        with torch.inference_mode():
            times = alternate({k: prefill(m.eval()) for k, m in models.items()}, args.repeats, args.warmup)
        rows.append(row(f"prefill {dtype}", "tok/s", T, times, shape=f"1x{T}"))
    return rows


def measure_decode(ref, ours, args) -> list[dict]:
    P, N = args.shape["prompt"], args.shape["new_tokens"]
    rows = []
    for dtype in ("fp32", "bf16"):
        models = {"transformers": ref, "hf_gpt": ours}
        if dtype == "bf16":
            models = {k: copy.deepcopy(m).to(torch.bfloat16) for k, m in models.items()}
        for B in args.shape["decode_batches"]:
            torch.manual_seed(4)
            ids = torch.randint(0, ref.config.vocab_size, (B, P))
            kw = greedy_kwargs(ids, N, ref.config.eos_token_id)
            outputs = {}

            def generate(name, m, ids=ids, kw=kw, outputs=outputs):
                def run():
                    outputs[name] = m.generate(ids, **kw)

                return run

            times = alternate({k: generate(k, m.eval()) for k, m in models.items()}, args.repeats, args.warmup)
            same = (outputs["transformers"] == outputs["hf_gpt"]).float().mean().item()
            rows.append(row(f"decode {dtype} batch {B}", "tok/s", B * N, times, same_tokens=same, shape=f"{B}x{P}+{N}"))
        del models
    return rows


# ---------------------------------------------------------------- report


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    import transformers

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        git=rev,
        # (the decoding rows move with it: PASSIVE threads sleep, and every parallel op then wakes them)
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def verdict(r: dict) -> str:
    target = TARGETS.get(r["name"])
    if target is None:
        return ""
    op, value = target
    met = r["ratio"] >= value if op == ">=" else r["ratio"] <= value
    r["target"], r["met"] = f"{op} {value}", met
    return f"{op} {value} {'met' if met else 'MISSED'}"


def table(rows: list[dict]) -> str:
    lines = [
        "| measurement | unit | transformers | hf_gpt | hf_gpt / transformers | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = f" ({r['shape']})" if "shape" in r else ""
        lines.append(
            f"| {r['name']}{shape} | {r['unit']} | {r['transformers']:.1f} | {r['hf_gpt']:.1f} | "
            f"{r['ratio']:.2f}x | {verdict(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        folder, which, dtype = args.memory_child
        result = memory_child(folder, which, dtype, args.threads, args.shape["batch"], args.shape["seq"])
        print(json.dumps(result))
        return 0
    if args.train_child:
        print(json.dumps(train_child(*args.train_child, args)))
        return 0
    groups = set(args.rows.split(","))
    command = "hf-gpt bench " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    print(f"# {command}\n# {info}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_reference(folder, args.shape["model"])
        ref, ours = load(folder, "transformers"), load(folder, "hf_gpt")
        parity = check_same_model(ref, ours, ref.config.vocab_size)
        print(f"# same weights and fp32 logits at the start: {parity}", flush=True)
        rows: list[dict] = []
        if "train" in groups:
            rows += measure_training(folder, args)
        if "memory" in groups:
            rows += measure_memory(folder, args)
        if "prefill" in groups:
            rows += measure_prefill(ref, ours, args)
        if "decode" in groups:
            rows += measure_decode(ref, ours, args)
        profiled = profile_training(ref, ours, args) if "profile" in groups else None
    text = table(rows)
    print(text)
    result = dict(
        command=command,
        machine=info,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        shape={k: v for k, v in args.shape.items()},
        n_params=sum(p.numel() for p in ours.parameters()),
        parity=parity,
        rows=rows,
        table=text,
        profile=profiled,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
