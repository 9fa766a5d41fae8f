"""The CPU training fast paths chosen by size and dtype (issue 18) compute what the plain paths compute."""

import copy
import gc
import sys
import types

import pytest
import torch

import hf_gpt
from hf_gpt import cli
from hf_gpt.modeling_gpt import RECOMPUTE_ACTIVATION_MIN_WIDTH
from training import arguments, data, train_lm


def _model(n_embd: int, **kw) -> hf_gpt.GPTForCausalLM:
    torch.manual_seed(0)
    cfg = hf_gpt.GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=4, n_embd=n_embd, **kw)
    return hf_gpt.GPTForCausalLM(cfg).train()


def _grads_and_saved_bytes(model: hf_gpt.GPTForCausalLM, ids: torch.Tensor) -> tuple[dict, int]:
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_activation_recompute_follows_width_and_keeps_the_gradients():
    """Wide models rebuild the MLP activation in backward (less memory), narrow ones keep it (faster); both give
    the same gradients."""
    assert not _model(RECOMPUTE_ACTIVATION_MIN_WIDTH // 2).transformer.h[0].mlp.recompute
    wide = _model(RECOMPUTE_ACTIVATION_MIN_WIDTH, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert all(b.mlp.recompute for b in wide.transformer.h)
    keeping = copy.deepcopy(wide)
    for b in keeping.transformer.h:
        b.mlp.recompute = False
    ids = torch.randint(0, 50, (3, 16))
    g_re, saved_re = _grads_and_saved_bytes(wide, ids)
    g_keep, saved_keep = _grads_and_saved_bytes(keeping, ids)
    for name in g_re:
        torch.testing.assert_close(g_re[name], g_keep[name], rtol=0, atol=1e-6, msg=name)
    # One (B, T, 4C) fp32 activation per block is not kept (the hook sees the rebuilt recipe, not the tensor).
    assert saved_keep - saved_re >= 2 * 3 * 16 * 4 * RECOMPUTE_ACTIVATION_MIN_WIDTH * 4


def test_bf16_training_attention_written_out_equals_sdpa_on_cpu():
    """bf16 training on CPU takes the written-out attention (SDPA's bf16 CPU backward is slow); its loss and
    gradients match the fp32 (SDPA) step's to bf16 accuracy, and fp32 still goes through SDPA exactly."""
    import hf_gpt.modeling_gpt as mg

    model = _model(64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 50, (4, 16))
    calls = []
    real = mg.eager_attention_forward

    def counting(*a, **k):
        calls.append(a[1].dtype)
        return real(*a, **k)

    mg.eager_attention_forward = counting
    try:
        with torch.autocast("cpu", torch.bfloat16):
            loss16 = model(input_ids=ids, labels=ids).loss
        loss16.backward()
        g16 = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        assert calls == [torch.bfloat16] * 2  # both layers, written out
        calls.clear()
        loss32 = model(input_ids=ids, labels=ids).loss
        loss32.backward()
        assert calls == []  # fp32 keeps SDPA
    finally:
        mg.eager_attention_forward = real
    assert abs(loss16.item() - loss32.item()) < 2e-2
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item() + 1e-6
        assert (g16[n] - p.grad).abs().max().item() <= 0.05 * scale, n


_MALLOC_PROBE = """
import ctypes, sys
from training.allocator import keep_freed_memory_for_reuse

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_blocks_for(size):
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(p)
    return during - before

def heap_kept_after_free(size):
    p = libc.malloc(size)  # at the top of the heap, which grows for it
    before = libc.mallinfo2().arena
    libc.free(p)
    return libc.mallinfo2().arena >= before

# Each case in a fresh process: glibc raises its thresholds itself once it has freed a mapped block.
case = sys.argv[1]
if case == "default":
    print(mmapped_blocks_for(16 << 20))
elif case == "mmap threshold alone":  # what keep_freed_memory_for_reuse did before it set the trim threshold too
    libc.mallopt(-3, 32 << 20)
    print(mmapped_blocks_for(16 << 20), heap_kept_after_free(16 << 20))
else:
    print(keep_freed_memory_for_reuse(), mmapped_blocks_for(16 << 20), heap_kept_after_free(16 << 20))
"""


def test_training_keeps_freed_memory_in_the_heap_on_glibc():
    """After `keep_freed_memory_for_reuse`, a 16 MiB block (an activation of the main job's size) comes from the
    heap, where the next step reuses it, instead of a fresh mmap; before it, glibc maps it. Freed at the top of
    the heap, it stays there; with the mmap threshold alone glibc would give it back to the kernel at once."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc" or tuple(map(int, version.split("."))) < (2, 33):
        pytest.skip("needs glibc 2.33+ (mallinfo2)")

    def probe(case: str) -> list[str]:
        repo = Path(__file__).resolve().parent.parent
        run = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, case], cwd=repo, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert probe("default") == ["1"]
    assert probe("mmap threshold alone") == ["0", "False"]
    assert probe("ours") == ["True", "0", "True"]


@pytest.mark.slow  # a whole (tiny) hf-gpt train run
def test_hf_gpt_train_on_cpu_sets_the_allocator_before_training(monkeypatch, tmp_path, text_file):
    """`hf-gpt train` on CPU calls `keep_freed_memory_for_reuse` once, before the first training step."""
    from transformers import TrainerCallback

    from training import train_lm

    events = []
    monkeypatch.setattr(train_lm, "keep_freed_memory_for_reuse", lambda: events.append("allocator") or True)

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            events.append("step")

    argv = [
        "--output_dir", str(tmp_path / "run"), "--train_file", str(text_file), "--data_cache_dir", str(tmp_path / "cache"),
        "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--max_steps", "2",
        "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no", "--num_samples", "0",
        "--report_to", "none",
    ]  # fmt: skip
    assert train_lm.main(argv, callbacks=[FirstStep()]) == 0
    assert events == ["allocator", "step", "step"]


def test_the_program_keeps_its_imports_out_of_the_collectors_sight(monkeypatch):
    """`hf-gpt` (`cli.run`) freezes what the command imported before running it, so full collections during the run and
    at exit skip it; `cli.main` called from a longer-lived process (a test, a notebook) leaves the collector alone."""
    seen = []
    probe = types.ModuleType("hf_gpt_gc_probe")
    probe.main = lambda argv: seen.append(gc.get_freeze_count()) or 0
    monkeypatch.setitem(sys.modules, "hf_gpt_gc_probe", probe)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("hf_gpt_gc_probe:main", "records the frozen object count"))
    monkeypatch.setattr(sys, "argv", ["hf-gpt", "probe"])
    gc.unfreeze()
    try:
        assert cli.main(["probe"]) == 0
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 0
        assert gc.get_freeze_count() > 0  # frozen again after the command, for the shutdown
    finally:
        gc.unfreeze()
    assert seen[0] == 0 and seen[1] > 10_000  # (the interpreter alone holds tens of thousands of objects)


def test_a_model_from_scratch_takes_the_exact_gelu_and_a_preset_or_checkpoint_keeps_its_own(tmp_path):
    tok = data.char_tokenizer(["abc"])
    scratch = train_lm.build_model(arguments.ModelArguments(n_embd=16, n_layer=1, n_head=2), 32, tok)
    assert scratch.config.activation_function == "gelu"
    assert isinstance(scratch.transformer.h[0].mlp.act, torch.nn.GELU) and scratch.transformer.h[0].mlp.act.approximate == "none"  # fmt: skip
    chosen = arguments.ModelArguments(n_embd=16, n_layer=1, n_head=2, activation_function="gelu_new")
    assert train_lm.build_model(chosen, 32, tok).config.activation_function == "gelu_new"
    preset = arguments.ModelArguments(preset="gpt2", n_embd=16, n_layer=1, n_head=2)
    assert train_lm.build_model(preset, 32, tok).config.activation_function == "gelu_new"  # GPT-2's tanh GELU
    scratch.save_pretrained(tmp_path / "base")
    finetune = arguments.ModelArguments(model_name_or_path=str(tmp_path / "base"))
    assert train_lm.build_model(finetune, 32, tok).config.activation_function == "gelu"
    finetune.activation_function = "relu"
    with pytest.raises(ValueError, match="--activation_function applies to a model trained from scratch"):
        train_lm.build_model(finetune, 32, tok)
    with pytest.raises(ValueError, match="activation_function 'gelu_fast' is unknown"):
        train_lm.build_model(arguments.ModelArguments(activation_function="gelu_fast"), 32, tok)


@pytest.mark.parametrize(
    ("n_embd", "from_scratch", "flags", "lr"),
    [
        (128, True, [], arguments.SMALL_MODEL_LR),  # the main job's model
        (arguments.SMALL_MODEL_MAX_WIDTH + 32, True, [], arguments.LEARNING_RATE),  # wider ones want less
        (128, False, [], arguments.LEARNING_RATE),  # fine-tuning
        (128, True, ["--learning_rate", "1e-3"], 1e-3),  # given: kept
        (768, False, ["--learning_rate", "5e-5"], 5e-5),
    ],
)
def test_the_default_learning_rate_follows_the_models_width_and_a_given_one_is_kept(n_embd, from_scratch, flags, lr):
    targs = arguments.parse_args(["--report_to", "none", *flags])[3]
    config = hf_gpt.GPTConfig(vocab_size=65, n_positions=64, n_layer=2, n_head=4, n_embd=n_embd)
    targs.choose_learning_rate(config, from_scratch=from_scratch)
    assert targs.learning_rate == lr and arguments.SMALL_MODEL_LR != arguments.LEARNING_RATE
    targs.choose_learning_rate(hf_gpt.GPTConfig(vocab_size=65, n_embd=1024, n_layer=1, n_head=4), from_scratch=True)
    assert targs.learning_rate == lr  # settled once


@pytest.mark.slow  # a whole (tiny) hf-gpt train run
def test_hf_gpt_train_trains_with_the_learning_rate_its_model_settles(tmp_path, text_file):
    """A model wider than `SMALL_MODEL_MAX_WIDTH` from scratch: the optimizer starts at `LEARNING_RATE`, not at the
    placeholder `SMALL_MODEL_LR` the arguments hold until the model is built."""
    import json

    from transformers import TrainerCallback

    lrs = []

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs.append((args.learning_rate, optimizer.param_groups[0]["initial_lr"]))

    run = tmp_path / "run"
    argv = [
        "--output_dir", str(run), "--train_file", str(text_file), "--data_cache_dir", str(tmp_path / "cache"),
        "--n_layer", "1", "--n_head", "2", "--n_embd", str(arguments.SMALL_MODEL_MAX_WIDTH + 32), "--block_size", "16",
        "--max_steps", "1", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
        "--num_samples", "0", "--report_to", "none",
    ]  # fmt: skip
    assert train_lm.main(argv, callbacks=[FirstStep()]) == 0
    assert lrs == [(arguments.LEARNING_RATE, arguments.LEARNING_RATE)]
    info = json.loads((run / "run_info.json").read_text())
    assert info["training_args"]["learning_rate"] == arguments.LEARNING_RATE
